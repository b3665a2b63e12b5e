// `sandbox.files` with the JS SDK, a 50 MiB round trip checked by sha256 on both sides and
// inside the sandbox, and signed URLs fetched without any header.

import assert from 'node:assert/strict'
import { createHash, randomBytes } from 'node:crypto'
import { after, before, describe, test } from 'node:test'
import { Sandbox } from 'e2b'

import { TIMEOUT_MS } from './helpers.mjs'

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex')

describe('files', { timeout: 480_000 }, () => {
  let sbx
  before(async () => {
    sbx = await Sandbox.create({ timeoutMs: TIMEOUT_MS, metadata: { suite: 'js' } })
  })
  after(async () => {
    if (sbx) await Sandbox.kill(sbx.sandboxId).catch(() => {})
  })

  test('write, read, list, exists, rename, remove', async () => {
    const dir = '/root/js-files'
    assert.equal(await sbx.files.makeDir(dir), true)
    assert.equal(await sbx.files.makeDir(dir), false)
    const info = await sbx.files.write(`${dir}/a.txt`, 'héllo from js')
    assert.equal(info.path, `${dir}/a.txt`)
    assert.equal(await sbx.files.read(`${dir}/a.txt`), 'héllo from js')
    const bytes = new Uint8Array(1024).map((_, i) => i % 256)
    await sbx.files.write(`${dir}/b.bin`, bytes.buffer)
    assert.deepEqual(await sbx.files.read(`${dir}/b.bin`, { format: 'bytes' }), bytes)
    const names = (await sbx.files.list(dir)).map((e) => e.name).sort()
    assert.deepEqual(names, ['a.txt', 'b.bin'])
    assert.equal(await sbx.files.exists(`${dir}/a.txt`), true)
    await sbx.files.rename(`${dir}/a.txt`, `${dir}/c.txt`)
    assert.equal(await sbx.files.exists(`${dir}/a.txt`), false)
    assert.equal(await sbx.files.read(`${dir}/c.txt`), 'héllo from js')
    await sbx.files.remove(dir)
    assert.equal(await sbx.files.exists(dir), false)
  })

  test('50 MiB upload and download keep every byte', { timeout: 360_000 }, async () => {
    const data = randomBytes(50 << 20)
    const digest = sha256(data)
    await sbx.files.write('/root/js-big.bin', new Blob([data]), { requestTimeoutMs: 240_000 })
    const inside = (await sbx.commands.run('sha256sum /root/js-big.bin', { timeoutMs: 120_000 })).stdout.split(' ')[0]
    assert.equal(inside, digest)
    const back = await sbx.files.read('/root/js-big.bin', { format: 'bytes', requestTimeoutMs: 240_000 })
    assert.equal(back.length, data.length)
    assert.equal(sha256(back), digest)
    await sbx.files.remove('/root/js-big.bin')
  })

  test('signed URLs work with plain fetch', async () => {
    const path = '/root/js-signed.txt'
    const form = new FormData()
    form.append('file', new Blob(['uploaded by fetch']), 'js-signed.txt')
    const upload = await sbx.uploadUrl(path)
    assert.match(upload, /signature=/)
    const put = await fetch(upload, { method: 'POST', body: form })
    assert.equal(put.status, 200, await put.text())
    assert.equal(await sbx.files.read(path), 'uploaded by fetch')
    const got = await fetch(await sbx.downloadUrl(path))
    assert.equal(got.status, 200)
    assert.equal(await got.text(), 'uploaded by fetch')
  })
})
