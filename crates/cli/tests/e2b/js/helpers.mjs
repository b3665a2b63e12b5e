// Shared helpers for the E2B JS SDK (2.51) suite against `wrenn up`.
//
// crates/cli/tests/e2b_sdk.rs copies these files next to a node_modules with the pinned SDK
// and runs `node --test` with only E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set. Every
// sandbox made here has a short timeout and is killed when its test ends.

import { randomBytes } from 'node:crypto'
import { Sandbox } from 'e2b'

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL', 'E2B_API_KEY']) {
  if (!process.env[name]) {
    throw new Error(`${name} is not set: run these tests through \`cargo test --test e2b_sdk\``)
  }
}

/** Milliseconds a test sandbox lives unless killed first. */
export const TIMEOUT_MS = 300_000

/** A value no other test (or earlier run) uses, for metadata filters. */
export function unique(prefix) {
  return `${prefix}-${randomBytes(6).toString('hex')}`
}

/** Runs `body(sandbox)` on a new sandbox, killed afterwards whatever happens. */
export async function withSandbox(templateOrOpts, opts, body) {
  let sbx
  if (typeof templateOrOpts === 'string') {
    sbx = await Sandbox.create(templateOrOpts, { timeoutMs: TIMEOUT_MS, ...opts })
  } else {
    sbx = await Sandbox.create({ timeoutMs: TIMEOUT_MS, ...templateOrOpts })
    body = opts
  }
  try {
    return await body(sbx)
  } finally {
    await Sandbox.kill(sbx.sandboxId).catch((e) => console.log(`killing ${sbx.sandboxId}: ${e}`))
  }
}

/** Polls `check()` until it returns something truthy; throws naming `what`. */
export async function waitFor(check, timeoutMs, what, intervalMs = 500) {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await check()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms`)
    await new Promise((resolve) => setTimeout(resolve, intervalMs))
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
