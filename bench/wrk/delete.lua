-- DELETE /delete_var?key=… walking through keys "del-<thread>-<n>" (n from 1) that bench/run.py
-- seeds before each delete run (python -m bench --target URL seeds them through the API); a
-- run deletes them, and past them the answers are 404, which still cost one statement.
package.path = (debug.getinfo(1, "S").source:match("@?(.*/)") or "./") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
local n = 0
request = function()
  n = n + 1
  return wrk.format("DELETE", "/delete_var?key=del-" .. (thread_id or 1) .. "-" .. n)
end
