if out=$(cat /etc/shadow 2>&1); then echo "RESULT escaped: read /etc/shadow"; else echo "RESULT blocked: cat /etc/shadow: $out"; fi
