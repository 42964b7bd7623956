"""The sidecar program: one per run, between the agent and everything outside its container.

It hosts the model gateway (and, for tests and the demo, the scripted model behind it). Every line it
prints on stdout is one JSON event that the supervisor copies into the run's audit trail.
"""
