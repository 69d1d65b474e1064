-- PUT /edit_var on pre-seeded keys: every answer should be 200.
package.path = (debug.getinfo(1, "S").source:match("@?(.*/)") or "./") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
request = function()
  return wrk.format("PUT", "/edit_var", c.json,
    '{"key": "' .. c.random_key() .. '", "value": "edited-' .. math.random(1, 1e9) .. '"}')
end
