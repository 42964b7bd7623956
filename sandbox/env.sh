# Sourced by the entry points of the agent's containers (agent, check): the environment every tool inside
# shares. Extra certificate authorities from the policy (egress.ca_certificates) arrive as
# /sandbox/in/ca-certificates.pem; they are added to the system's bundle for every TLS client that reads one.
extra_ca=/sandbox/in/ca-certificates.pem
if [ -s "$extra_ca" ]; then
  bundle=/tmp/.sandbox-ca-bundle.pem
  cat /etc/ssl/certs/ca-certificates.crt "$extra_ca" >"$bundle"
  export SSL_CERT_FILE="$bundle" REQUESTS_CA_BUNDLE="$bundle" CURL_CA_BUNDLE="$bundle" PIP_CERT="$bundle" \
         GIT_SSL_CAINFO="$bundle" npm_config_cafile="$bundle" NODE_EXTRA_CA_CERTS="$extra_ca"
fi

# Wait for the supervisor's go-ahead ($1): it first strips every route out of this container's network
# namespace but the one to the sidecar. No code of the agent's may run before that.
wait_for_go_ahead() {
  local gate=$1
  # Every 10 ms: the go-ahead is on the run's critical path (30 s at most).
  for _ in $(seq 1 3000); do
    [ -e "$gate" ] && return 0
    sleep 0.01
  done
  echo "sandbox: the supervisor never gave the go-ahead ($gate)" >&2
  exit 65
}
