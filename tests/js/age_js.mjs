// The typage reference implementation of age (npm "age-encryption", by age's author) as a tiny CLI
// for interoperability tests: keys and files made here must open there, and the other way round.
//   node age_js.mjs keygen-pq                      -> identity line, then recipient line
//   node age_js.mjs encrypt RECIPIENT < in > out   (recipients may repeat)
//   node age_js.mjs decrypt IDENTITY_FILE < in > out
import { readFileSync } from "node:fs";
import * as age from "age-encryption";

const input = () => new Uint8Array(readFileSync(0));
const [cmd, ...args] = process.argv.slice(2);
if (cmd === "keygen-pq") {
  const id = await age.generateHybridIdentity();
  process.stdout.write(`${id}\n${await age.identityToRecipient(id)}\n`);
} else if (cmd === "encrypt") {
  const e = new age.Encrypter();
  for (const r of args) e.addRecipient(r);
  process.stdout.write(await e.encrypt(input()));
} else if (cmd === "decrypt") {
  const d = new age.Decrypter();
  for (const line of readFileSync(args[0], "utf8").split("\n")) {
    if (line.trim() && !line.startsWith("#")) d.addIdentity(line.trim());
  }
  process.stdout.write(await d.decrypt(input()));
} else {
  process.stderr.write("usage: age_js.mjs keygen-pq | encrypt RECIPIENT... | decrypt IDENTITY_FILE\n");
  process.exit(2);
}
