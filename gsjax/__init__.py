"""gsjax: a search-augmented image-generation agent (Gen-Searcher) trained and served with JAX/Flax."""

__version__ = "0.1.0"
