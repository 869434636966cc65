#!/bin/sh
# asynckarton demo sample: a shell script
echo "installing nothing at all"
exit 0
