// `--check-async`: cancellation tokens, progress from the board, typed
// errors, where JSON calls run, how command names travel, replies read
// from threads that come and go (and strings freed after they were read),
// and pixel buffers and the board read after (or while) they are released,
// checked against the real worker. Prints one line per failed check and "async
// checks passed" when none failed.
using System;
using System.Collections.Generic;
using System.Threading;
using System.Threading.Tasks;
using EmbeddedWorker;
using Python.Runtime;

namespace EmbeddedWorkerHost
{
    public static class AsyncChecks
    {
        /// <summary>Reports kept in order, on the reporting thread (Progress&lt;T&gt; would post them elsewhere).</summary>
        sealed class Reports : IProgress<WorkProgress>
        {
            public readonly List<WorkProgress> Seen = new List<WorkProgress>();
            public Action<WorkProgress> Then;

            public void Report(WorkProgress value)
            {
                lock (Seen) Seen.Add(value);
                if (Then != null) Then(value);
            }
        }

        public static int Run(PythonRuntime runtime)
        {
            int failed = 0;
            Action<bool, string> check = (ok, what) => { if (!ok) { failed++; Console.WriteLine("CHECK FAILED: " + what); } };
            var worker = new EmbeddedProcessingWorker(runtime);
            var service = new ServiceProcessing(worker);

            // 1. a wait with progress, to the end; polls served from the board while it runs
            var started = service.StartSessionAsync("img-generation-basic", new { steps = 30, seed = 1 }).Result;
            string id = started.Text("session_id");
            var running = worker.GetSessionStatus(id);
            check(running.Success, "typed status: " + running.Error);
            var reports = new Reports();
            var final = worker.WaitForSessionAsync(id, reports, requireSuccess: true).Result;
            check(final.Status == "completed" && final.CompletedAt != null, "waited to completed (" + final.Status + ")");
            check(reports.Seen.Count >= 2 && reports.Seen[reports.Seen.Count - 1].Percent == 100,
                  "progress reports from the board: " + reports.Seen.Count);
            for (int i = 1; i < reports.Seen.Count; i++)
                check(reports.Seen[i].Percent >= reports.Seen[i - 1].Percent, "progress never goes back");
            check(worker.GetSessionStatus(id).FromBoard && worker.GetSessionStatus(id).CompletedAt == final.CompletedAt,
                  "a final status is kept and served from the board while its row is unchanged");

            // 2. a token that fires mid-run, asked to cancel the work: the wait throws, the session is cancelled
            var slow = service.StartSessionAsync("img-generation-basic", new { steps = 150, seed = 2 }).Result;
            string slowId = slow.Text("session_id");
            var source = new CancellationTokenSource();
            var cancelReports = new Reports { Then = p => { if (p.CurrentStep > 0 || p.DenoiseStep >= 3) source.Cancel(); } };
            source.CancelAfter(TimeSpan.FromSeconds(60));
            try
            {
                worker.WaitForSessionAsync(slowId, cancelReports, cancelWorkOnCancel: true, cancellationToken: source.Token).Wait();
                check(false, "a cancelled wait must throw");
            }
            catch (AggregateException error)
            {
                check(error.InnerException is OperationCanceledException, "cancelled wait: " + error.InnerException.GetType().Name);
            }
            var afterCancel = worker.WaitForSessionAsync(slowId).Result;
            check(afterCancel.Status == "cancelled", "the work itself was cancelled (" + afterCancel.Status + ")");

            // 3. a token that fires without cancelling the work: only the wait stops
            var kept = service.StartSessionAsync("img-generation-basic", new { steps = 150, seed = 3 }).Result;
            string keptId = kept.Text("session_id");
            var quick = new CancellationTokenSource(TimeSpan.FromMilliseconds(300));
            try
            {
                worker.WaitForSessionAsync(keptId, cancellationToken: quick.Token).Wait();
                check(false, "a timed-out wait must throw");
            }
            catch (AggregateException error)
            {
                check(error.InnerException is OperationCanceledException, "timed-out wait: " + error.InnerException.GetType().Name);
            }
            var stillRunning = worker.GetSessionStatus(keptId);
            check(!stillRunning.IsFinal, "the work goes on after the wait gave up (" + stillRunning.Status + ")");
            worker.ControlSession(keptId, "cancel");

            // 4. ServiceProcessing's own wait and calls honour a token
            var cancelled = new CancellationTokenSource();
            cancelled.Cancel();
            var refused = service.GetSessionStatusAsync(id, cancelled.Token);
            check(refused.IsCanceled, "ExecuteAsync with a cancelled token: a cancelled task");
            try
            {
                service.WaitForSessionAsync(keptId, TimeSpan.FromMilliseconds(20), TimeSpan.FromMinutes(1), cancelled.Token).Wait();
                check(false, "ServiceProcessing.WaitForSessionAsync must throw when cancelled");
            }
            catch (AggregateException error)
            {
                check(error.InnerException is OperationCanceledException, "ServiceProcessing wait: " + error.InnerException.GetType().Name);
            }

            // 5. a batch, its item counts from the board
            var batch = worker.ExecuteBatch(new { workflow_id = "img-generation-basic",
                                                  parameters = new { steps = 4, seed = 10, total_images = 4 } });
            var batchReports = new Reports();
            var batchFinal = worker.WaitForBatchAsync(batch.Text("batch_id"), batchReports).Result;
            check(batchFinal.Status == "completed" && batchFinal.ProcessedItems == 4, "batch of 4: " + batchFinal.Status);
            check(batchReports.Seen.Count > 0 && batchReports.Seen[batchReports.Seen.Count - 1].ItemsDone == 4,
                  "batch progress from the board");

            // 6. typed errors
            try
            {
                worker.WaitForSessionAsync("no-such-session").Wait();
                check(false, "waiting for an unknown session must throw");
            }
            catch (AggregateException error)
            {
                var typed = error.InnerException as WorkerException;
                check(typed != null && typed.Code == WorkerErrorCode.NotFound, "unknown session: NotFound");
            }
            var bad = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic", priority = "high" });
            check(bad.Code == WorkerErrorCode.InvalidRequest, "priority \"high\": InvalidRequest (" + bad.ErrorCode + ")");
            try { bad.EnsureSuccess(); check(false, "EnsureSuccess must throw"); }
            catch (WorkerException error) { check(error.Code == WorkerErrorCode.InvalidRequest, "EnsureSuccess: typed"); }
            var failedWait = worker.WaitForSessionAsync(slowId, requireSuccess: true);
            try { failedWait.Wait(); check(false, "requireSuccess on a cancelled session must throw"); }
            catch (AggregateException error)
            {
                var typed = error.InnerException as WorkFailedException;
                check(typed != null && typed.Status == "cancelled" && typed.Code == WorkerErrorCode.Cancelled,
                      "requireSuccess: WorkFailedException(cancelled)");
            }

            // 7. JSON in: the request is read (in C#) to decide where it runs; a blocking one leaves the caller's thread
            const string blockingJson = "{\"workflow_id\": \"img-generation-basic\", \"parameters\": {\"steps\": 30, \"seed\": 4},\n"
                                        + " \"background\" :\tfalse}";
            var blocking = worker.ExecuteJsonAsync(PythonWorkerType.Processing, "execute_workflow", blockingJson);
            check(!blocking.IsCompleted, "background false in JSON (any spacing): run off the caller's thread");
            check(blocking.Result.Contains("\"completed\""), "the blocking JSON request completed: " + blocking.Result);
            var distributed = worker.ExecuteJsonAsync(PythonWorkerType.Processing, null,
                "{\"type\": \"execute_workflow\", \"request_id\": \"r-7\", \"data\": {\"workflow_id\": \"img-generation-basic\", "
                + "\"parameters\": {\"steps\": 30, \"seed\": 5}, \"background\": false}}");
            check(!distributed.IsCompleted, "the distributed form blocks when its data does");
            check(distributed.Result.Contains("\"r-7\"") && distributed.Result.Contains("\"completed\""),
                  "the distributed form answered: " + distributed.Result);
            var poll = worker.ExecuteJsonAsync(PythonWorkerType.Processing, "get_session_status", "{\"session_id\": \"" + id + "\"}");
            check(poll.IsCompleted && poll.Result.Contains("\"completed\""), "a JSON status poll runs inline: " + poll.Result);
            var malformed = worker.ExecuteJsonAsync(PythonWorkerType.Processing, "get_session_status", "{not json");
            check(malformed.IsCompleted && malformed.Result.Contains("\"invalid_request\""), "malformed JSON: " + malformed.Result);

            // 8. command names go as spelled; the facade reads them (CamelCase, other domains)
            var camel = service.GetSessionStatusAsync(id).Result;
            var spelled = worker.ExecuteAsync(PythonWorkerType.Processing, "GetSessionStatus", new { session_id = id }).Result;
            check(spelled.Success && spelled.Text("status") == camel.Text("status"), "GetSessionStatus: " + spelled.Error);
            var devices = worker.ExecuteAsync(PythonWorkerType.Device, "list_devices", new { }).Result;
            check(devices.Success, "Device.list_devices: " + devices.Error);

            // 9. replies whose strings Python makes afresh each call (their addresses reused as they are freed), from
            //    threads that come and go: each reply names its own id (the reader's string table never answers stale text)
            int wrong = 0;
            for (int round = 0; round < 3; round++)
            {
                var threads = new List<Thread>();
                for (int t = 0; t < 4; t++)
                {
                    int thread = t + 4 * round;
                    threads.Add(new Thread(() =>
                    {
                        for (int i = 0; i < 500; i++)
                        {
                            string unknown = "gone-" + thread + "-" + i;
                            var reply = worker.Execute("get_session_status", new { session_id = unknown });
                            if (reply.Error != "Session '" + unknown + "' not found") Interlocked.Increment(ref wrong);
                        }
                    }));
                }
                foreach (var thread in threads) thread.Start();
                foreach (var thread in threads) thread.Join();
            }
            check(wrong == 0, "6,000 replies from 12 threads, each naming its own id: " + wrong + " wrong");
            check(worker.GetSessionStatus(id).Status == "completed", "calls still work after those threads ended");

            // 9b. strings Python shares (more than the reply holds them), read, then freed while new strings of the
            //     same size take their memory: the reader keeps such strings by address, so it must hold them alive
            int stale = 0;
            using (Py.GIL())
            {
                for (int i = 0; i < 2000; i++)
                {
                    string expected = "shared-" + i.ToString("D6");
                    using (var text = new PyString(expected))
                    using (var dict = new PyDict())
                    {
                        dict["k"] = text;
                        if (PyConvert.ToReply(dict).Text("k") != expected) stale++;
                    }
                }
            }
            check(stale == 0, "2,000 shared strings, each freed after its read: " + stale + " answered with freed text");

            // 10. buffers: the format is read (through the C API, also on CoreCLR, where pythonnet's PyBUF.FORMATS
            //     aborted the process); a read after release, or racing it, is ObjectDisposedException, never a crash
            var outputId = ((Reply)worker.Execute("get_session_status", new { session_id = id }).List("outputs")[0]).Text("output_id");
            Reply refusal;
            var view = worker.GetOutput(outputId, out refusal);
            check(view != null && view.Format == "B" && view.Channels == 3 && !view.IsDisposed,
                  "an output view with its format read: " + (view == null ? refusal.Error : view.Format));
            int pixel = view[view.Height - 1, view.Width - 1, 2] + view.ToArray()[0];
            var raced = new int[4];
            var readers = new List<Thread>();
            for (int t = 0; t < 4; t++)
            {
                int reader = t;
                readers.Add(new Thread(() =>
                {
                    try { while (true) pixel += view[reader, reader, 0]; }
                    catch (ObjectDisposedException) { raced[reader] = 1; }
                }));
            }
            foreach (var thread in readers) thread.Start();
            Thread.Sleep(50);
            view.Dispose();  // while four threads read it
            foreach (var thread in readers) thread.Join();
            check(Array.TrueForAll(raced, r => r == 1), "readers racing Dispose each end with ObjectDisposedException");
            check(view.IsDisposed && view.Pointer == IntPtr.Zero, "a released view says so and has no pointer");
            foreach (var read in new Action[] { () => pixel += view[0, 0, 0], () => view.ToArray(),
                                                () => view.CopyRow(0, new byte[view.Width * view.Channels], 0) })
            {
                try { read(); check(false, "a read after release must throw"); }
                catch (ObjectDisposedException) { }
            }
            view.Dispose();  // twice: nothing
            var board = worker.OpenBoard();
            BoardRow row;
            check(board.Slots > 0 && board.TryRead(0, out row), "a board reads its rows");
            board.Dispose();
            check(!board.TryRead(0, out row), "a disposed board reads as empty");

            Console.WriteLine(failed == 0 ? "async checks passed" : "async checks FAILED: " + failed);
            return failed == 0 ? 0 : 1;
        }
    }
}
