"""curation: CLIP embeddings, aesthetic and text-image scores, technical scores, deduplication,
named views and plots → STORE/embeddings/<tag>/, STORE/scores/<tag>/, STORE/views/."""
