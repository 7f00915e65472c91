"""sam_data: SA-1B — the links-file downloader (resumable, verified), the `ingest sam` source
(tars or extracted folders, image ids and mask counts) and the import of existing dense captions.

- `links`: parse Meta's links file and md5 checklists
- `download`: resumable, verified HTTP download of the tars (`alphaset sam download`)
- `ingest`: SA-1B tars / folders as raw samples keyed `sa_<image_id>` (`alphaset ingest sam`)
- `captions`: captions keyed by SA id into `captions/<tag>/` (`alphaset sam captions`, `--captions`)
- `cli`: the `alphaset sam …` commands
"""
