// The sandbox lifecycle with the JS SDK: create, info, setTimeout, list, kill, errors.

import assert from 'node:assert/strict'
import { test } from 'node:test'
import { AuthenticationError, NotFoundError, Sandbox, SandboxError } from 'e2b'

import { unique, withSandbox } from './helpers.mjs'

test('create with defaults, run, info, kill', { timeout: 120_000 }, async () => {
  const sbx = await Sandbox.create()
  try {
    assert.ok(sbx.sandboxId)
    assert.equal(await sbx.isRunning(), true)
    assert.equal((await sbx.commands.run('echo hi')).stdout, 'hi\n')
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.ok([info.templateId, info.name].includes('base'), JSON.stringify(info))
    assert.equal(info.state, 'running')
    assert.deepEqual(info.metadata, {})
    const lifetime = (info.endAt - info.startedAt) / 1000
    assert.ok(lifetime >= 240 && lifetime <= 330, `lifetime ${lifetime}`)
  } finally {
    assert.equal(await sbx.kill(), true)
  }
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
  assert.equal(await sbx.isRunning(), false)
  await assert.rejects(Sandbox.connect(sbx.sandboxId), SandboxError)
})

test('create with template, timeout, metadata and envs; setTimeout', { timeout: 120_000 }, async () => {
  const tag = unique('js-args')
  await withSandbox(
    'base',
    { timeoutMs: 120_000, metadata: { suite: 'js', case: tag }, envs: { WRENN_GREETING: 'hello from js' } },
    async (sbx) => {
      assert.equal((await sbx.commands.run('echo "$WRENN_GREETING"')).stdout, 'hello from js\n')
      const info = await sbx.getInfo()
      assert.deepEqual(info.metadata, { suite: 'js', case: tag })
      const lifetime = (info.endAt - info.startedAt) / 1000
      assert.ok(lifetime >= 100 && lifetime <= 140, `lifetime ${lifetime}`)
      await sbx.setTimeout(600_000)
      const later = (await sbx.getInfo()).endAt
      assert.ok(later > info.endAt)
      const remaining = (later - Date.now()) / 1000
      assert.ok(remaining >= 560 && remaining <= 640, `remaining ${remaining}`)
    },
  )
})

test('list by metadata and state, one per page', { timeout: 180_000 }, async () => {
  const tag = unique('js-list')
  await withSandbox({ metadata: { 'wrenn-list': tag } }, async (a) => {
    await withSandbox({ metadata: { 'wrenn-list': tag } }, async (b) => {
      const ours = new Set([a.sandboxId, b.sandboxId])
      const all = await Sandbox.list({ query: { metadata: { 'wrenn-list': tag } } }).nextItems()
      assert.deepEqual(new Set(all.map((s) => s.sandboxId)), ours)
      const running = await Sandbox.list({ query: { metadata: { 'wrenn-list': tag }, state: ['running'] } }).nextItems()
      assert.deepEqual(new Set(running.map((s) => s.sandboxId)), ours)
      const paused = await Sandbox.list({ query: { metadata: { 'wrenn-list': tag }, state: ['paused'] } }).nextItems()
      assert.deepEqual(paused, [])

      const paginator = Sandbox.list({ query: { metadata: { 'wrenn-list': tag } }, limit: 1 })
      const first = await paginator.nextItems()
      assert.equal(first.length, 1)
      assert.equal(paginator.hasNext, true)
      const second = await paginator.nextItems()
      assert.equal(second.length, 1)
      assert.deepEqual(new Set([first[0].sandboxId, second[0].sandboxId]), ours)
      if (paginator.hasNext) assert.deepEqual(await paginator.nextItems(), [])
      assert.equal(paginator.hasNext, false)
    })
  })
})

test('unknown sandbox and wrong key', { timeout: 60_000 }, async () => {
  await assert.rejects(Sandbox.connect('wrennnosuchsandbox00'), NotFoundError)
  assert.equal(await Sandbox.kill('wrennnosuchsandbox00'), false)
  const apiKey = 'e2b_' + '0123456789abcdef'.repeat(2) + '01234567'
  await assert.rejects(Sandbox.create({ apiKey, timeoutMs: 30_000 }), AuthenticationError)
})
