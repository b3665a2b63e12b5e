// Pause and resume with the JS SDK: files and a running process survive.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { Sandbox } from 'e2b'

import { sleep, unique, waitFor, withSandbox } from './helpers.mjs'

const ticks = async (sbx) => (await sbx.files.read('/root/ticks.txt')).split('\n').filter(Boolean).length

test('pause, list as paused, connect resumes', { timeout: 240_000 }, async () => {
  const tag = unique('js-pause')
  await withSandbox({ metadata: { 'wrenn-pause': tag } }, async (sbx) => {
    await sbx.files.write('/root/kept.txt', 'before the pause')
    const ticker = await sbx.commands.run('while true; do echo tick >> /root/ticks.txt; sleep 1; done', {
      background: true,
      timeoutMs: 0,
    })
    await waitFor(async () => (await sbx.files.exists('/root/ticks.txt')) && (await ticks(sbx)) >= 2, 15_000, 'the ticker')
    // The ticker runs on in the sandbox without its output stream.
    await ticker.disconnect()

    assert.equal(await sbx.pause(), true)
    const paused = await Sandbox.list({ query: { metadata: { 'wrenn-pause': tag }, state: ['paused'] } }).nextItems()
    assert.deepEqual(
      paused.map((s) => [s.sandboxId, s.state]),
      [[sbx.sandboxId, 'paused']],
    )

    const resumed = await Sandbox.connect(sbx.sandboxId)
    assert.equal((await resumed.getInfo()).state, 'running')
    assert.equal(await resumed.files.read('/root/kept.txt'), 'before the pause')
    assert.ok((await resumed.commands.list()).some((p) => p.pid === ticker.pid))
    const before = await ticks(resumed)
    await sleep(3000)
    assert.ok((await ticks(resumed)) > before, 'the ticker did not go on after the resume')
    assert.equal((await resumed.commands.run('echo back')).stdout, 'back\n')
    assert.equal(await resumed.commands.kill(ticker.pid), true)
  })
})
