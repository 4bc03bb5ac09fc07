"""Reporting: what the notebooks show and what the README says, computed from recorded results.

    results    save(out_dir, cfg, metrics, figures, tables): the last cell of every notebook
    stats      mean +- std over seeds, orderings that need non-overlapping intervals (else "tied")
    claims     every paper claim: its threshold, its verdict, from structured metrics (the one place)
    plots      the figures
    readme     the generated README results block
    publish    executed notebooks and figures a reader sees without running anything (results/published/)
"""
from .results import save, table_rows  # noqa: F401
