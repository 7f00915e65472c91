"""sam_data: SA-1B — the links-file downloader (resumable, verified) and the `ingest sam` source
(tars or extracted folders, image ids and mask counts, imported dense captions)."""
