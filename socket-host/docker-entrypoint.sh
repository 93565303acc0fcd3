#!/bin/sh
# The image's entrypoint. Platforms (Railway among them) mount the volume root-owned at /data, so the image
# starts as root: this script takes ownership of the data dir for the run uid, then runs the command as that
# uid with no capabilities left. Nothing else runs as root.
#
#   WAKEEPER_RUN_UID   uid (and gid) the command runs as (default 10001, the image's wakeeper user); 0 = stay root
#   WAKEEPER_DATA_DIR  the data dir to own (default /data)
#
# Run as a uid other than root, or with WAKEEPER_RUN_UID=0, it changes nothing and runs the command as it is;
# the host then checks that its data dir is writable and says what to set when it is not.
# Exit codes: 64 for a bad setting (uid not a number, data dir a symlink or not a directory), 69 when setpriv
# is missing.
set -eu

fail() {
    code=$1
    shift
    printf 'docker-entrypoint: %s\n' "$*" >&2
    exit "$code"
}

[ "$#" -gt 0 ] || fail 64 "no command given"

uid=${WAKEEPER_RUN_UID:-10001}
case $uid in
    '' | *[!0-9]*) fail 64 "WAKEEPER_RUN_UID must be a number (a uid), got '$uid'" ;;
esac
dir=${WAKEEPER_DATA_DIR:-/data}

if [ "$(id -u)" != 0 ] || [ "$uid" -eq 0 ]; then
    exec "$@"
fi

command -v setpriv >/dev/null 2>&1 || fail 69 "setpriv (util-linux) is missing; cannot drop to uid $uid"

# A symlink could point the chown below at any file of the image.
if [ -L "$dir" ]; then
    fail 64 "data dir $dir is a symlink; refusing to take ownership of what it points to (set WAKEEPER_DATA_DIR to the real path)"
fi
if [ -e "$dir" ] && [ ! -d "$dir" ]; then
    fail 64 "data dir $dir exists and is not a directory"
fi
mkdir -p -- "$dir"
if [ "$(stat -c %u -- "$dir")" -ne "$uid" ]; then
    printf 'docker-entrypoint: taking ownership of %s for uid %s\n' "$dir" "$uid" >&2
    # -h: a symlink inside the data dir is changed itself, never what it points to.
    chown -R -h "$uid:$uid" -- "$dir"
fi
chmod 0700 -- "$dir"

# root's HOME (/root) is closed to the run uid; the data dir is the wakeeper user's home, as under USER 10001.
export HOME="$dir"
exec setpriv --reuid="$uid" --regid="$uid" --clear-groups --inh-caps=-all -- "$@"
