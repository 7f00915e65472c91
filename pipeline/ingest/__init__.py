"""Ingest sources: enumerate raw samples from folders, WebDataset tars, URL lists and PixArt
data_info files; `writer` turns them into store shards. SA-1B lives in `sam_data`.

SOURCES maps the name `alphaset ingest NAME` accepts to the module that owns that source.
"""

SOURCES = {
    "folder": "pipeline.ingest.folder",
    "wds": "pipeline.ingest.wds",
    "urls": "pipeline.ingest.urls",
    "pixart": "pipeline.ingest.pixart",
    "sam": "sam_data.ingest",
}
