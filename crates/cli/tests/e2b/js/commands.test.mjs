// `sandbox.commands` with the JS SDK: runs, errors, background + connect from a second
// object, stdin.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import { CommandExitError, Sandbox } from 'e2b'

import { TIMEOUT_MS, waitFor } from './helpers.mjs'

describe('commands', { timeout: 300_000 }, () => {
  let sbx
  before(async () => {
    sbx = await Sandbox.create({ timeoutMs: TIMEOUT_MS, metadata: { suite: 'js' } })
  })
  after(async () => {
    if (sbx) await Sandbox.kill(sbx.sandboxId).catch(() => {})
  })

  test('echo', async () => {
    const result = await sbx.commands.run('echo hi')
    assert.equal(result.stdout, 'hi\n')
    assert.equal(result.stderr, '')
    assert.equal(result.exitCode, 0)
  })

  test('non-zero exit rejects with CommandExitError', async () => {
    await assert.rejects(sbx.commands.run('echo partial; echo broken >&2; exit 3'), (err) => {
      assert.ok(err instanceof CommandExitError, String(err))
      assert.equal(err.exitCode, 3)
      assert.equal(err.stderr, 'broken\n')
      assert.equal(err.stdout, 'partial\n')
      return true
    })
  })

  test('cwd, envs, user and streamed stdout', async () => {
    const result = await sbx.commands.run('pwd; echo "$WRENN_VAR"; id -un', {
      cwd: '/tmp',
      envs: { WRENN_VAR: 'js value' },
      user: 'root',
    })
    assert.equal(result.stdout, '/tmp\njs value\nroot\n')
    const arrivals = []
    const started = Date.now()
    await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 1; done', {
      onStdout: (chunk) => arrivals.push([Date.now() - started, chunk]),
    })
    const ended = Date.now() - started
    assert.equal(arrivals.map(([, c]) => c).join(''), 'line1\nline2\nline3\n')
    assert.ok(arrivals[0][0] < ended - 1500, JSON.stringify({ arrivals, ended }))
  })

  test('background command: listed, connected from a second object, killed', async () => {
    const handle = await sbx.commands.run('sleep 30; echo done', { background: true })
    assert.ok(handle.pid > 0)
    const listed = await sbx.commands.list()
    assert.ok(listed.some((p) => p.pid === handle.pid), JSON.stringify(listed))
    const other = await Sandbox.connect(sbx.sandboxId)
    const connected = await other.commands.connect(handle.pid)
    assert.equal(connected.pid, handle.pid)
    assert.equal(await connected.kill(), true)
    await assert.rejects(connected.wait(), CommandExitError)
    await waitFor(
      async () => !(await sbx.commands.list()).some((p) => p.pid === handle.pid),
      10_000,
      'the killed command leaving the list',
    )
    assert.equal(await sbx.commands.kill(handle.pid), false)
  })

  test('output that arrives after connect', async () => {
    const handle = await sbx.commands.run('sleep 2; echo late', { background: true })
    const other = await Sandbox.connect(sbx.sandboxId)
    const result = await (await other.commands.connect(handle.pid)).wait()
    assert.equal(result.stdout, 'late\n')
    assert.equal(result.exitCode, 0)
  })

  test('stdin: send and close', async () => {
    const handle = await sbx.commands.run('cat', { background: true, stdin: true })
    await sbx.commands.sendStdin(handle.pid, 'first line\n')
    await handle.sendStdin(new TextEncoder().encode('second line\n'))
    await sbx.commands.closeStdin(handle.pid)
    const result = await handle.wait()
    assert.equal(result.stdout, 'first line\nsecond line\n')
  })
})
