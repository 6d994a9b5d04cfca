# Not an escape by itself: /usr is executable anyway. Shows that running the loader directly is
# governed by what may be mapped executable, not by execve of the program.
loader=$(ls /lib64/ld-linux-*.so.* /lib/ld-linux-*.so.* 2>/dev/null | head -1)
if "$loader" /usr/bin/true; then echo "RESULT allowed: $loader /usr/bin/true runs (/usr is an execute root)"; else echo "RESULT blocked: $loader /usr/bin/true failed"; fi
