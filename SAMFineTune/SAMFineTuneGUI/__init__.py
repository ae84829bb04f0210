"""The module panel's sections (Qt): imported by SAMFineTune.py inside the Slicer application only.

Each section owns a group of the panel's widgets and the jobs they start; the panel
(``SAMFineTuneWidget``) keeps the parameter node in step with them and polls their jobs.
"""
