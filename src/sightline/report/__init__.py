"""Reports: figures (one module per analysis), summary.json and a static HTML page."""
