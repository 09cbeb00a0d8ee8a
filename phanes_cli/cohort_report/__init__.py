"""Cohort reports: a self-contained HTML page and QC figures for a screening run."""
