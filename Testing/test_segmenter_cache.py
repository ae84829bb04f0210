"""SegmenterCache: one segmenter per model (model, checkpoint, device, encoder precision and
backend), the adapter swapped in place, the old model let go before a new one loads (a stand-in
Segmenter records what happens)."""
import pytest

from SAMFineTuneLib import segmenter as segmenter_module
from SAMFineTuneLib.segmenter_cache import SegmenterCache


class FakeSegmenter:
    created = []

    def __init__(self, model, checkpoint, device, precision, backend, cache=None, cancel=None):
        self.key = (model, checkpoint, device)
        self.encoder = (precision, backend)
        self.model = object()
        self.adapters = []
        # what the cache still held while this one was being built: nothing, or the old one leaks
        self.held_while_loading = cache.segmenter if cache is not None else None
        FakeSegmenter.created.append(self)

    def set_adapter(self, adapter):
        self.adapters.append(adapter)


@pytest.fixture
def cache(monkeypatch):
    FakeSegmenter.created = []
    loaded = []
    holder = SegmenterCache(on_load=loaded.append)
    monkeypatch.setattr(segmenter_module, "Segmenter", lambda **options: FakeSegmenter(**options, cache=holder))
    holder.loaded = loaded
    return holder


def test_one_segmenter_per_model_checkpoint_and_device(cache, tmp_path):
    first = cache.get("litemedsam", device="cpu")
    assert cache.get("litemedsam", device="cpu") is first and cache.loaded == [first]
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"weights")
    second = cache.get("sam_vit_b", checkpoint=str(checkpoint), device="cpu")
    assert second is not first and second.key == ("sam_vit_b", str(checkpoint), "cpu")
    assert second.held_while_loading is None  # the old model was let go before the new one loaded
    assert cache.loaded == [first, second]
    assert cache.get("sam_vit_b", checkpoint=str(checkpoint), device="cpu") is second


def test_the_encoders_precision_and_backend_pick_the_model_too(cache):
    default = cache.get("litemedsam", device="cpu")
    assert default.encoder == ("auto", "auto")  # the catalogue's defaults: OpenVINO on a CPU where installed
    torch_one = cache.get("litemedsam", device="cpu", backend="torch")
    assert torch_one is not default and torch_one.encoder == ("auto", "torch")
    assert cache.loaded_model("litemedsam", None, "cpu") is None
    assert cache.loaded_model("litemedsam", None, "cpu", backend="torch") is torch_one.model
    bf16 = cache.get("litemedsam", device="cpu", precision="bf16", backend="torch")
    assert bf16 is not torch_one and bf16.encoder == ("bf16", "torch")
    assert cache.get("litemedsam", device="cpu", precision=None, backend=None).encoder == ("auto", "auto")


def test_the_adapter_is_swapped_in_place_and_training_reuses_only_a_bare_model(cache, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    segmenter = cache.get("litemedsam", device="cpu")
    assert cache.loaded_model("litemedsam", None, "cpu") is segmenter.model
    assert cache.get("litemedsam", device="cpu", adapter=str(adapter)) is segmenter
    assert segmenter.adapters == [str(adapter)] and cache.adapter == str(adapter)
    assert cache.loaded_model("litemedsam", None, "cpu") is None  # an adapter is merged in
    cache.get("litemedsam", device="cpu")
    assert segmenter.adapters == [str(adapter), None] and len(FakeSegmenter.created) == 1
    assert cache.loaded_model("litemedsam", None, "cuda") is None


def test_a_server_hands_the_next_client_the_warm_model_without_the_last_ones_adapter_or_embeddings(cache, tmp_path):
    from SAMFineTuneLib.worker.core import WorkerCore

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    core = WorkerCore()
    core.segmenters = cache
    segmenter = cache.get("litemedsam", device="cpu", adapter=str(adapter))
    segmenter.cache = type("Cache", (), {"cleared": 0, "clear": lambda self: setattr(self, "cleared", 1)})()
    assert core.info()["adapter"] == str(adapter)
    core.forget_client()  # the server does this when a client leaves
    assert core.info()["adapter"] is None and segmenter.adapters == [str(adapter), None]
    assert segmenter.cache.cleared and cache.segmenter is segmenter  # the model stays warm
    core.forget_client()
    assert segmenter.adapters == [str(adapter), None]  # nothing to swap back a second time


def test_missing_files_are_named_before_anything_loads(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth"):
        cache.get("sam_vit_b", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        cache.get("litemedsam", adapter=str(tmp_path / "missing"))
    assert FakeSegmenter.created == [] and cache.segmenter is None


def test_a_train_job_reuses_the_warm_model_only_for_the_encoder_it_asks_for(cache, monkeypatch, tmp_path):
    """Training learns from the encoder's embeddings: a run asking for bf16 must not be handed the
    warm float32 model (nor the reverse)."""
    import types

    from SAMFineTuneLib.worker import jobs

    given = []

    def fake_train(config, model=None):
        given.append(model)
        return {}

    lazy = jobs._lazy
    stand_ins = {"train": fake_train, "check_start": lambda config: None}  # no dataset here
    monkeypatch.setattr(jobs, "_lazy", lambda module, name, command: stand_ins.get(name) or lazy(module, name, command))
    warm = cache.get("litemedsam", device="cpu")
    core = types.SimpleNamespace(loaded_model=lambda *key: cache.loaded_model(*key),
                                 segmenters=types.SimpleNamespace(segmenter=None))
    params = dict(dataset=str(tmp_path), output=str(tmp_path / "out"), device="cpu")
    for extra in ({}, {"precision": "bf16"}, {"backend": "torch"}):
        jobs.train(core, types.SimpleNamespace(params=dict(params, **extra), command="train"))
    assert given == [warm.model, None, None]
