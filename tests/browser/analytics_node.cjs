// Segment's Node SDK against the gateway: node analytics_node.cjs <host> <writeKey> <userId> <groupId>
// Sends identify, group, three tracks, a page and a screen, flushes, and exits non-zero on any
// delivery error (printed on stderr).
const { Analytics } = require("@segment/analytics-node");

const [host, writeKey, userId, groupId] = process.argv.slice(2);
const analytics = new Analytics({ writeKey, host, flushAt: 50, flushInterval: 200, maxRetries: 0 });
const errors = [];
analytics.on("error", (err) => errors.push(err));

analytics.identify({ userId, traits: { email: `${userId}@acme.io`, createdAt: 1705312800 } });
analytics.group({ userId, groupId, traits: { name: "Acme", mrr: "99.5" } });
for (let i = 0; i < 3; i++) {
  analytics.track({ userId, event: "Report Exported", properties: { format: "csv" } });
}
analytics.page({ userId, category: "Docs", name: "Getting Started" });
analytics.screen({ userId, name: "Settings" });

analytics.closeAndFlush({ timeout: 20000 }).then(() => {
  if (errors.length) {
    for (const err of errors) console.error(JSON.stringify(err, Object.getOwnPropertyNames(err)));
    process.exit(1);
  }
  console.log("flushed");
});
