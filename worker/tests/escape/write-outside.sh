for path in /usr/flotilla-escape /etc/flotilla-escape /flotilla-escape /opt/cargo/bin/flotilla-escape /proc/flotilla-escape "$ESCAPE_HOST_PATH/flotilla-escape"; do
  if touch "$path" 2>/dev/null; then echo "RESULT escaped: created $path"; exit 0; fi
done
err=$(touch /usr/flotilla-escape 2>&1)
echo "RESULT blocked: $err (and /etc, /, /opt, /proc, the data directory)"
