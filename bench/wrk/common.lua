-- Shared by every varstack wrk script. Keys "bench-0" .. "bench-(BENCH_KEYS-1)" are
-- pre-seeded by bench/run.py. Each wrk thread gets its own id so the scripts that create or
-- delete keys never collide across threads. wrk itself reports socket errors and the count
-- of non-2xx/3xx answers.
local M = {}
M.keys = tonumber(os.getenv("BENCH_KEYS") or "10000")
local counter = 0

function M.setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function M.random_key()
  return "bench-" .. math.random(0, M.keys - 1)
end

M.json = { ["Content-Type"] = "application/json" }

return M
