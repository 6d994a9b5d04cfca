cp /usr/bin/true /tmp/copied-true && chmod +x /tmp/copied-true
if /tmp/copied-true 2>/dev/null; then echo "RESULT escaped: ran a binary copied to /tmp"; exit 0; fi
cp /usr/bin/true /dev/shm/copied-true && chmod +x /dev/shm/copied-true
if /dev/shm/copied-true 2>/dev/null; then echo "RESULT escaped: ran a binary copied to /dev/shm"; exit 0; fi
err=$(/tmp/copied-true 2>&1)
echo "RESULT blocked: $err (and /dev/shm)"
