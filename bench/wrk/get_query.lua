-- GET /get_var?key=… on pre-seeded keys.
package.path = (debug.getinfo(1, "S").source:match("@?(.*/)") or "./") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
request = function()
  return wrk.format("GET", "/get_var?key=" .. c.random_key())
end
