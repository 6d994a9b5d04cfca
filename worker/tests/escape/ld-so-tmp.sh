loader=$(ls /lib64/ld-linux-*.so.* /lib/ld-linux-*.so.* 2>/dev/null | head -1)
cp /usr/bin/true /tmp/copied-true
if err=$("$loader" /tmp/copied-true 2>&1); then echo "RESULT escaped: $loader ran a binary copied to /tmp"; exit 0; fi
echo "RESULT blocked: $loader /tmp/copied-true: $err"
