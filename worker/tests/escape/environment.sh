found=""
for file in /proc/[0-9]*/environ; do
  if tr '\0' '\n' < "$file" 2>/dev/null | grep -q "^$ESCAPE_CANARY_NAME="; then found="$found $file"; fi
done
count=$(tr '\0' '\n' < /proc/1/environ 2>/dev/null | grep -c .)
if [ -n "$found" ]; then echo "RESULT escaped: worker variable in$found"; else echo "RESULT blocked: no worker variable in any /proc/*/environ (/proc/1/environ has $count variables)"; fi
