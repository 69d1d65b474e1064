-- A realistic mix on pre-seeded keys: 80% reads (half query, half JSON body), 15% edits,
-- 5% creates of new keys.
package.path = (debug.getinfo(1, "S").source:match("@?(.*/)") or "./") .. "?.lua;" .. package.path
local c = require("common")
setup = c.setup
local n = 0
local run = tostring(os.time())
request = function()
  local r = math.random(1, 100)
  if r <= 40 then
    return wrk.format("GET", "/get_var?key=" .. c.random_key())
  elseif r <= 80 then
    return wrk.format("GET", "/get_var", c.json, '{"key": "' .. c.random_key() .. '"}')
  elseif r <= 95 then
    return wrk.format("PUT", "/edit_var", c.json,
      '{"key": "' .. c.random_key() .. '", "value": "m' .. r .. '"}')
  end
  n = n + 1
  return wrk.format("POST", "/set_var", c.json,
    '{"key": "mix-' .. run .. '-' .. (thread_id or 0) .. '-' .. n .. '", "value": "v"}')
end
