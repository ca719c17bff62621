# Shell functions the scripts share (sourced, not run).

# Waits until replica namespace $1 has applied what it acknowledged: the replica acknowledges a
# generation once its commit record is durable, applies it to its images right after, and then
# removes the record (docs/PROTOCOL.md, "Replica commit order").
settled() {
  for _ in $(seq 1000); do [ -e "$1/.ferry/staging/commit" ] || return 0; sleep 0.01; done
  echo "replica $1 has not applied its last generation after 10 s" >&2
  return 1
}
