# x86_64 numbers: ptrace = 101; PTRACE_ATTACH = 16 (to pid 1, bubblewrap), PTRACE_TRACEME = 0.
r=$(perl -e '$r = syscall(101, 16, 1, 0, 0); print $r < 0 ? "errno=".($!+0) : "ok"')
case "$r" in ok) echo "RESULT escaped: PTRACE_ATTACH to pid 1 succeeded"; exit 0;; esac
s=$(perl -e '$r = syscall(101, 0, 0, 0, 0); print $r < 0 ? "errno=".($!+0) : "ok"')
case "$s" in ok) echo "RESULT escaped: PTRACE_TRACEME succeeded"; exit 0;; esac
if command -v strace >/dev/null; then t=$(strace -f true 2>&1 | grep -m1 -iE "not permitted|ptrace" || echo "strace output has no ptrace error"); else t="no strace"; fi
echo "RESULT blocked: ptrace attach $r, traceme $s (1 = EPERM); strace: $t"
