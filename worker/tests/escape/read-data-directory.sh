for path in "$ESCAPE_HOST_PATH" "/proc/1/root$ESCAPE_HOST_PATH" "/proc/self/root$ESCAPE_HOST_PATH"; do
  if ls -A "$path" >/dev/null 2>&1; then echo "RESULT escaped: listed $path"; exit 0; fi
done
echo "RESULT blocked: $ESCAPE_HOST_PATH is not visible (also via /proc/1/root, /proc/self/root)"
