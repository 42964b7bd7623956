"""The Kubernetes backend (docs/kubernetes.md): manifests.py (the run's objects, pure), backend.py (the run handle
on a small set of cluster calls), client.py (those calls on the official client), transfer.py (files in and out
of pods as tar streams). Only client.py imports the `kubernetes` client, so the rest loads without it."""
