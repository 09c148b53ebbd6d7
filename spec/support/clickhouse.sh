#!/bin/bash
# The tests' ClickHouse helper is the one netra ships for scenarios:
#   clickhouse.sh start|stop|kill|restart DIR [PORT]
# (see lua/netra/scenario/clickhouse.sh).
exec bash "$(dirname "$0")/../../lua/netra/scenario/clickhouse.sh" "$@"
