"""The OpenVINO conversion cache keeps to what is used: keeping a conversion removes the entries
only another installation reads (another OpenVINO, traced packages or cache format) once they
have gone unused for a while, and never an entry another process may be writing or reading."""
import json
import logging
import os
import time

import pytest
import torch

from SAMFineTuneLib import openvino_encoder
from SAMFineTuneLib.openvino_encoder import STALE_AFTER_S, OpenVinoEncoder, available, remove_stale_entries

from test_openvino_encoder import cache, tiny_net  # noqa: F401  (fixtures)

# Never pytest.importorskip("openvino"): importing it bare would start its telemetry in this process.
pytestmark = pytest.mark.skipif(not available(), reason="openvino is not installed")
LONG_AGO = time.time() - 2 * STALE_AFTER_S


def fake_entry(cache, name, key=None, when=LONG_AGO, text=None):
    """An entry folder as another process would have left it, last used at ``when``."""
    folder = cache / name
    folder.mkdir(parents=True)
    (folder / "encoder.blob").write_bytes(b"blob")
    (folder / "entry.json").write_text(text if text is not None else json.dumps({"key": key, "sha256": ""}))
    for path in (folder / "entry.json", folder / "encoder.blob", folder):
        os.utime(path, (when, when))
    return folder


def test_keeping_a_conversion_removes_other_installations_entries_unused_for_a_week(tiny_net, cache, caplog):
    OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    (ours,) = os.listdir(cache)
    key = json.loads((cache / ours / "entry.json").read_text())["key"]
    older_openvino = dict(key, openvino="2020.1.0")
    kept = {"recent-upgrade": fake_entry(cache, "recent-upgrade", older_openvino, when=time.time() - 3600),
            "other-weights": fake_entry(cache, "other-weights", dict(key, fingerprint="tiny:9")),
            "other-cpu": fake_entry(cache, "other-cpu", dict(key, cpu="another CPU")),
            ".being-written.part": fake_entry(cache, ".being-written.part", when=time.time())}
    gone = {"old-openvino": fake_entry(cache, "old-openvino", older_openvino),
            "old-torch": fake_entry(cache, "old-torch", dict(key, packages=dict(key["packages"], torch="1.0"))),
            "old-format": fake_entry(cache, "old-format", dict(key, format=0)),
            "unreadable": fake_entry(cache, "unreadable", text="{"),
            ".killed-writer.part": fake_entry(cache, ".killed-writer.part")}
    (cache / "a-file").write_text("not an entry")
    os.symlink(cache / "old-openvino", cache / "a-link")
    with caplog.at_level(logging.INFO, logger="SAMFineTuneLib.openvino_encoder"):
        assert not OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:2").from_cache
    assert "removed 5 converted encoder(s) of another OpenVINO or package version" in caplog.text
    left = set(os.listdir(cache))
    assert set(kept) <= left and not set(gone) & left and {ours, "a-file", "a-link"} <= left
    assert len(left) == len(kept) + 4 and not [name for name in left if name.endswith(".removing")]
    assert OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1").from_cache


def test_reading_an_entry_dates_its_use(tiny_net, cache):
    """So another installation's cleaner keeps an entry this one still reads, however old its writing."""
    OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    (ours,) = os.listdir(cache)
    for path in (cache / ours / "entry.json", cache / ours / "encoder.blob", cache / ours):
        os.utime(path, (LONG_AGO, LONG_AGO))
    assert OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1").from_cache
    key = json.loads((cache / ours / "entry.json").read_text())["key"]
    assert remove_stale_entries(dict(key, openvino="2099.1.0")) == [] and os.listdir(cache) == [ours]
    assert remove_stale_entries(dict(key, openvino="2099.1.0"), now=time.time() + 2 * STALE_AFTER_S) == [ours]
    assert os.listdir(cache) == []


def test_an_entry_removed_while_a_process_begins_to_read_it_is_a_miss_not_damage(tiny_net, cache, monkeypatch,
                                                                                 caplog):
    """The race a cleaner leaves open: it judged the entry unused just before a reader dated it."""
    OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    (ours,) = os.listdir(cache)
    mark_used = openvino_encoder.mark_used

    def removed_meanwhile(folder, marker):
        mark_used(folder, marker)
        os.rename(folder, cache / f".{ours}.0000.removing")  # the cleaner's rename aside, then its delete

    monkeypatch.setattr(openvino_encoder, "mark_used", removed_meanwhile)
    with caplog.at_level(logging.WARNING, logger="SAMFineTuneLib.openvino_encoder"):
        again = OpenVinoEncoder(tiny_net, 16, fingerprint="tiny:1")
    assert not again.from_cache and "damaged" not in caplog.text and ours in os.listdir(cache)
