"""`alphaset app`: one Gradio app with two tabs, Generate (PixArt sampling through
`training.sample`) and Explore (a store's images, filters, views, duplicates and semantic search).

The handlers live in plain modules that a notebook can call without Gradio: `explore` (reading a
store: pages of rows with on-the-fly thumbnails, detail of a key, dedup groups, faiss search) and
`generate` (one loaded model per process, requests run one at a time). `ui` lays them out as a
``gr.Blocks``; `cli` is the ``alphaset app`` command.
"""
