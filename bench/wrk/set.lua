-- POST /set_var of keys no one created before: every answer should be 201.
package.path = (debug.getinfo(1, "S").source:match("@?(.*/)") or "./") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
local n = 0
local run = tostring(os.time())
request = function()
  n = n + 1
  local key = "new-" .. run .. "-" .. (thread_id or 0) .. "-" .. n
  return wrk.format("POST", "/set_var", c.json, '{"key": "' .. key .. '", "value": "v"}')
end
