# A .gitattributes filter and diff driver whose definitions sit in a global git configuration
# the worker's user would read: host git must never run them. The verdict is the test's.
printf '* filter=flotillaevil diff=flotillaevil\n' > .gitattributes && echo data > data.txt && echo "RESULT submitted: a filter driver"
