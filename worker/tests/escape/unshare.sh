if err=$(unshare -r true 2>&1); then echo "RESULT escaped: unshare -r worked"; exit 0; fi
r=$(perl -e '$r = syscall(272, 0x10000000, 0, 0, 0); print $r < 0 ? "errno=".($!+0) : "ok"')
case "$r" in ok) echo "RESULT escaped: unshare(CLONE_NEWUSER) succeeded"; exit 0;; esac
echo "RESULT blocked: unshare -r: $err; unshare(2) $r"
