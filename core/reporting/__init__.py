"""Reports over runs: ``plugtune report`` (core/reporting/report.py) reads run and adapter
folders (runs.py) and writes one self-contained HTML page and a PNG of the loss curves."""
