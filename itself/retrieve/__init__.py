"""Person search for users (`python -m itself.retrieve`; usage in cli.py):

    gallery.py   what a gallery is (dataset split, shards, folder), cut into resumable units
    build.py     embedding a gallery on one rank or many, parts merged into the index; `add`
    store.py     the index folder: index.json, the FAISS file, the stored embeddings per part
    entries.py   the index folder's JSON entries, checked (a folder may come from someone else)
    vectors.py   the fused score as one inner product; FAISS flat (exact) and HNSW indexes
    search.py    `Index`: a saved index and its model answering text queries
    report.py    the HTML report
    serve.py     the search page (HTTP)
"""

from .errors import RetrieveError
from .search import Index

__all__ = ["Index", "RetrieveError", "cli"]


def cli() -> None:
    """The `itself-retrieve` console script: `python -m itself.retrieve` under another name."""
    from .cli import main

    raise SystemExit(main())
