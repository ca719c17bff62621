# Shell functions the scripts share (sourced, not run).

# Waits until replica namespace $1 has applied what it acknowledged: the replica acknowledges a
# generation once its commit record is durable, applies it to its images right after, and then
# removes the record (docs/PROTOCOL.md, "Replica commit order").
settled() {
  for _ in $(seq 1000); do [ -e "$1/.ferry/staging/commit" ] || return 0; sleep 0.01; done
  echo "replica $1 has not applied its last generation after 10 s" >&2
  return 1
}

# Mounts $work/src on $mnt with config file $1, the daemon in the foreground of a background job
# logging to $2 (RUST_LOG=info); sets mount_pid. Uses the caller's $ferry, $work and $mnt.
mount_with() {
  RUST_LOG=info "$ferry" mount -f "$work/src" "$mnt" -o "config=$1" 2>"$2" &
  mount_pid=$!
  for _ in $(seq 200); do mountpoint -q "$mnt" && return; sleep 0.05; done
  echo "the mount did not come up: $(tail -3 "$2")" >&2
  exit 1
}

# Unmounts $mnt and waits for the daemon ($mount_pid). The last closes of a program that just
# exited (fio) can reach the daemon a moment later: the unmount is retried for 5 s.
unmount() {
  for _ in $(seq 50); do umount "$mnt" 2>/dev/null && break; sleep 0.1; done
  mountpoint -q "$mnt" && { echo "cannot unmount $mnt: $(fuser -vm "$mnt" 2>&1)" >&2; exit 1; }
  wait "$mount_pid" || true
  mount_pid=
}
