"""Recipe configuration (pydantic, no torch). Stage kinds: one module each, found by ``registry``."""
