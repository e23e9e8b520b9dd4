#!/usr/bin/env bash
# Read circuitwatch flags with curl and jq: the `circuitwatch` object sits next to `choices` in the response.
#   examples/clients/curl.sh http://127.0.0.1:8000 /models/my-model
set -euo pipefail
base=${1:-http://127.0.0.1:8000}
model=${2:?usage: curl.sh BASE_URL MODEL}

curl -sS "$base/v1/chat/completions" -H 'Content-Type: application/json' -d @- <<JSON | jq '{finish_reason: .choices[0].finish_reason, circuitwatch}'
{"model": "$model", "messages": [{"role": "user", "content": "The import statement"}], "max_tokens": 8}
JSON

# Streaming: the object is on the last `data:` chunk before `data: [DONE]` (the usage chunk when usage is asked for).
curl -sSN "$base/v1/completions" -H 'Content-Type: application/json' -d @- <<JSON | grep '^data: {' | tail -n 1 | cut -c7- | jq '.circuitwatch'
{"model": "$model", "prompt": "The import statement", "max_tokens": 8, "stream": true,
 "stream_options": {"include_usage": true}}
JSON
