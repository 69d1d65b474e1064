-- GET /get_var with the key in a JSON body: the original clients' style.
package.path = (debug.getinfo(1, "S").source:match("@?(.*/)") or "./") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
request = function()
  return wrk.format("GET", "/get_var", c.json, '{"key": "' .. c.random_key() .. '"}')
end
