// The official E2B JS SDK against `smolvm serve`, configured only by E2B_API_KEY,
// E2B_API_URL and E2B_SANDBOX_URL. Run with Node by tests/serve.rs; prints `ok: <name>` per
// check and exits 1 on any failure.
import { createHash, randomBytes } from 'node:crypto'
import { Sandbox, CommandExitError } from 'e2b'

function ok(name, facts) {
  console.log(`ok: ${name}${facts ? ' ' + JSON.stringify(facts) : ''}`)
}

function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`)
}

const sbx = await Sandbox.create({ timeoutMs: 300_000, metadata: { suite: 'e2b-js' } })
const r = await sbx.commands.run('echo hi from js')
assert(r.stdout === 'hi from js\n' && r.exitCode === 0, JSON.stringify(r))
ok('create + commands.run', { id: sbx.sandboxId })

try {
  await sbx.commands.run('echo nope >&2; exit 7')
  throw new Error('a failing command did not throw')
} catch (e) {
  assert(e instanceof CommandExitError && e.exitCode === 7 && e.stderr === 'nope\n', String(e))
}
ok('failing command throws CommandExitError')

await sbx.files.write('/root/js.txt', 'written by js\n')
assert((await sbx.files.read('/root/js.txt')) === 'written by js\n', 'text round trip')
const blob = randomBytes(1024 * 1024)
await sbx.files.write('/root/js.bin', blob)
const back = await sbx.files.read('/root/js.bin', { format: 'bytes' })
const sha = (b) => createHash('sha256').update(b).digest('hex')
assert(sha(Buffer.from(back)) === sha(blob), 'binary round trip')
ok('files.write / files.read', { sha256: sha(blob).slice(0, 16) })

assert((await sbx.kill()) === true, 'kill')
assert((await Sandbox.kill(sbx.sandboxId)) === false, 'second kill is false')
ok('kill')
console.log('all ok')
