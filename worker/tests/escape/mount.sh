mkdir -p /tmp/m
if err=$(mount -t tmpfs none /tmp/m 2>&1); then echo "RESULT escaped: mounted a tmpfs"; exit 0; fi
r=$(perl -e '$r = syscall(165, "none", "/tmp/m", "tmpfs", 0, 0); print $r < 0 ? "errno=".($!+0) : "ok"')
case "$r" in ok) echo "RESULT escaped: mount(2) succeeded"; exit 0;; esac
echo "RESULT blocked: mount: $err; mount(2) $r"
