-- DELETE /delete_var?key=… walking through keys "del-<thread>-<n>" that bench/run.py seeded
-- (BENCH_DELETE_KEYS per thread); past them the answers are 404 and still cost one statement.
package.path = debug.getinfo(1, "S").source:match("@?(.*/)") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
local n = 0
request = function()
  n = n + 1
  return wrk.format("DELETE", "/delete_var?key=del-" .. (thread_id or 1) .. "-" .. n)
end
