"""Many runs: sweeps over repositories, the ticket service, garbage collection and the operator's views."""
