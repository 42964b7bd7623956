"""One run: the request, the resolved spec, the supervisor that carries it out, its limits and its report."""
