// The sample host: ServiceProcessing's worker, in process.
//
//   mono EmbeddedWorkerHost.exe [--venv PATH] [--out DIR] [--summary FILE]
//   mono EmbeddedWorkerHost.exe --selftest [pytest arguments]
//   mono EmbeddedWorkerHost.exe --bench FILE
//
// The demo lists workflows, runs a session with a progress bar fed by the
// board (no GIL, no calls), runs a batch of eight with one seed each, pauses,
// resumes and cancels a session, runs img2img from a host-filled input
// buffer, and writes every image as PNG straight from the worker's memory.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Threading;
using Python.Runtime;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class Program
    {
        public static int Main(string[] args)
        {
            string venv = Option(args, "--venv");
            PythonRuntime runtime;
            try
            {
                runtime = PythonRuntime.Start(venv);
            }
            catch (Exception error)
            {
                Console.Error.WriteLine("cannot start Python: " + error.Message);
                return 2;
            }
            try
            {
                if (Array.IndexOf(args, "--selftest") >= 0) return SelfTest(runtime, args);
                if (Option(args, "--bench") != null) return HostBenchmarks.Run(runtime, Option(args, "--bench"));
                if (Array.IndexOf(args, "--check-async") >= 0) return AsyncChecks.Run(runtime);
                if (Option(args, "--leak-test") != null) return LeakTest.Run(runtime, int.Parse(Option(args, "--leak-test")));
                if (Option(args, "--hold-batch") != null)
                    return HoldBatch(runtime, Option(args, "--hold-batch"), int.Parse(Option(args, "--items") ?? "8"));
                return Demo(runtime, Option(args, "--out") ?? "demo_output", Option(args, "--summary"));
            }
            finally
            {
                runtime.Dispose();  // closes the worker (joins its threads), then PythonEngine.Shutdown()
            }
        }

        static string Option(string[] args, string name)
        {
            int at = Array.IndexOf(args, name);
            return at >= 0 && at + 1 < args.Length ? args[at + 1] : null;
        }

        /// <summary>The project's pytest suite inside this embedded interpreter, the way pythonnet tests itself.</summary>
        static int SelfTest(PythonRuntime runtime, string[] args)
        {
            var pytestArgs = new List<object> { "-q", "-p", "no:cacheprovider", "-m", "not soak and not dotnet",
                                                Path.Combine(runtime.RepoRoot, "tests") };
            int extra = Array.IndexOf(args, "--selftest") + 1;
            for (int i = extra; i < args.Length; i++) pytestArgs.Add(args[i]);
            Environment.CurrentDirectory = runtime.RepoRoot;
            using (Py.GIL())
            using (var pytest = Py.Import("pytest"))
            using (var arguments = PyConvert.ToPython(pytestArgs))
            using (var code = pytest.InvokeMethod("main", arguments))
            {
                int result = code.As<int>();
                Console.WriteLine("selftest: pytest inside the embedded interpreter exited with " + result);
                return result;
            }
        }

        static int Demo(PythonRuntime runtime, string outputFolder, string summaryPath)
        {
            Directory.CreateDirectory(outputFolder);
            var summary = new Dictionary<string, object>();
            var files = new List<object>();
            var checks = new Checks();
            var total = Stopwatch.StartNew();
            var worker = new EmbeddedProcessingWorker(runtime);
            var service = new ServiceProcessing(worker);
            string sessionId;
            using (var board = worker.OpenBoard())
            using (var logs = new LogPump(worker, record => Console.WriteLine(
                "  [python " + record.Text("level") + "] " + record.Text("message")), TimeSpan.FromMilliseconds(200)))
            {
                var clock = Stopwatch.StartNew();
                var workflows = service.GetWorkflowsAsync().Result;
                Console.WriteLine("workflows (" + workflows.Count + "):");
                foreach (var workflow in workflows)
                    Console.WriteLine("  " + workflow.Text("id") + ": " + workflow.Text("name"));
                checks.That(workflows.Count >= 3, "three built-in workflows listed");
                dynamic basic = worker.GetWorkflow("img-generation-basic");  // member access, no JSON anywhere
                checks.That(basic.success == true && basic.workflow.id == "img-generation-basic"
                            && basic.workflow.steps.Count == 2, "dynamic reply: reply.workflow.id");

                // 1. one session, progress from the board
                clock.Restart();
                var started = service.StartSessionAsync("img-generation-basic",
                    new { prompt = "a red circle on a blue background", seed = 42, steps = 60 }).Result;
                checks.That(started.Success, "session accepted: " + started.Error);
                sessionId = started.Text("session_id");
                var final = FollowOnBoard(board, (int)started.Number("board_slot"), sessionId);
                var status = worker.GetSessionStatus(sessionId);
                checks.That(status.Status == "completed", "session completed (" + status.Status + ")");
                var session = service.GetSessionStatusAsync(sessionId).Result;
                files.AddRange(WriteOutputs(worker, session.List("outputs"), outputFolder, "session", "img-generation-basic",
                                            new { prompt = "a red circle on a blue background", seed = 42, steps = 60 }, checks));
                Console.WriteLine("session: " + final.Status + " in " + clock.ElapsedMilliseconds + " ms");

                // 2. a batch of eight, one seed each (the bare form the C# client sends)
                clock.Restart();
                var batchParameters = new { prompt = "a red circle on a blue background", seed = 100, steps = 20, total_images = 8 };
                var batch = service.StartBatchAsync("img-generation-basic", batchParameters).Result;
                checks.That(batch.Success, "batch accepted: " + batch.Error);
                string batchId = batch.Text("batch_id");
                FollowOnBoard(board, (int)batch.Number("board_slot"), batchId);
                var batchStatus = worker.GetBatchStatus(batchId);
                checks.That(batchStatus.Status == "completed" && batchStatus.ProcessedItems == 8,
                            "batch of 8 completed (" + batchStatus.Status + ", " + batchStatus.ProcessedItems + ")");
                var batchReply = service.GetBatchStatusAsync(batchId).Result;
                files.AddRange(WriteOutputs(worker, batchReply.List("outputs"), outputFolder, "batch", "img-generation-basic",
                                            new { prompt = "a red circle on a blue background", steps = 20 }, checks));
                double seconds = clock.Elapsed.TotalSeconds;
                Console.WriteLine("batch: 8 images in " + (int)(seconds * 1000) + " ms (" + (8 / seconds).ToString("F1")
                                  + " img/s), " + ((Reply)batchReply["metrics"]).Number("total_batches") + " denoising group(s)");

                // 3. pause, resume, cancel a running session
                clock.Restart();
                var controlled = service.StartSessionAsync("img-generation-basic", new { seed = 7, steps = 150 }).Result;
                string controlledId = controlled.Text("session_id");
                int slot = (int)controlled.Number("board_slot");
                BoardRow row;
                WaitForBoard(board, slot, r => r.DenoiseStep >= 10);
                var paused = service.PauseAsync(controlledId).Result;
                checks.That(paused.Text("status") == "paused", "paused (" + paused.Text("status") + ")");
                board.TryRead(slot, out row);
                long heldAt = row.DenoiseStep;
                Thread.Sleep(300);
                board.TryRead(slot, out row);
                checks.That(row.DenoiseStep == heldAt && row.Status == "paused",
                            "no denoising while paused (step " + heldAt + " -> " + row.DenoiseStep + ")");
                var resumed = service.ResumeAsync(controlledId).Result;
                checks.That(resumed.Success, "resumed: " + resumed.Text("status"));
                WaitForBoard(board, slot, r => r.DenoiseStep > heldAt + 5);
                var cancelled = service.CancelAsync(controlledId).Result;
                checks.That(cancelled.Text("status") == "cancelled", "cancelled (" + cancelled.Text("status") + ")");
                Console.WriteLine("pause at step " + heldAt + ", resume, cancel: " + clock.ElapsedMilliseconds + " ms");

                // 4. img2img from an input the host writes in place
                clock.Restart();
                Reply inputError;
                string inputId;
                using (var input = worker.AllocateInput(32, 32, out inputError))
                {
                    checks.That(input != null, "input allocated: " + (inputError == null ? "" : inputError.Error));
                    for (int y = 0; y < input.Height; y++)
                        for (int x = 0; x < input.Width; x++)
                        {
                            input.Set(y, x, 0, (byte)(x * 8));
                            input.Set(y, x, 1, (byte)(y * 8));
                            input.Set(y, x, 2, 128);
                        }
                    inputId = input.InputId;
                }
                var img2img = worker.ExecuteWorkflow(new
                {
                    workflow_id = "img2img-basic",
                    parameters = new { init_image = inputId, strength = 0.6, steps = 20, seed = 5 },
                    background = false,
                });
                checks.That(img2img.Text("status") == "completed", "img2img from the input buffer: " + img2img.Error);
                files.AddRange(WriteOutputs(worker, img2img.List("outputs"), outputFolder, "img2img", "img2img-basic",
                                            new { strength = 0.6, steps = 20, seed = 5 }, checks));
                Console.WriteLine("img2img from a host-filled buffer: " + clock.ElapsedMilliseconds + " ms");

                // 5. the document's coordination (model -> inference batch -> enhance) and its status aggregation
                clock.Restart();
                string coordinationId = Guid.NewGuid().ToString();
                var coordination = service.CoordinateAsync(coordinationId, "builtin:tiny-sd",
                    new { prompt = "a yellow triangle on a black background", seed = 11, steps = 10 }, 3).Result;
                checks.That(coordination.Success, "coordination accepted: " + coordination.Error);
                var coordinated = service.WaitForSessionAsync(coordinationId, TimeSpan.FromMilliseconds(20),
                                                              TimeSpan.FromMinutes(5)).Result;
                var seeds = new List<object>();
                foreach (Reply output in coordinated.List("outputs")) seeds.Add(output.Number("seed"));
                checks.That(coordinated.Text("status") == "completed" && seeds.Count == 3,
                            "coordination completed with 3 images (" + coordinated.Text("status") + ")");
                var loadStep = (Reply)coordinated.List("step_results")[0];
                checks.That(Equals(((Reply)loadStep["result"])["loaded"], true), "model step loaded the model");
                var parts = service.GetAggregatedStatusAsync(coordinationId).Result;
                var domainStates = new Dictionary<string, object>();
                foreach (var part in parts)
                {
                    checks.That(part.Value.Success && part.Value.Text("status") == "completed",
                                part.Key + ".get_status for the session: " + part.Value.Error);
                    domainStates[part.Key] = part.Value.Text("status");
                }
                var modelState = ((Reply)parts["model"].List("models")[0]).Text("state");
                var imagesDone = ((Reply)parts["inference"]["counts"]).Number("done");
                var enhanceState = ((Reply)parts["postprocessing"].List("steps")[0]).Text("status");
                checks.That(modelState == "loaded" && imagesDone == 3 && enhanceState == "completed",
                            "aggregated: model " + modelState + ", " + imagesDone + " images done, enhance " + enhanceState);
                summary["coordination"] = new Dictionary<string, object>
                {
                    { "status", coordinated.Text("status") }, { "seeds", seeds }, { "model_state", modelState },
                    { "images_done", imagesDone }, { "enhance", enhanceState }, { "domains", domainStates },
                };
                Console.WriteLine("coordination: model.load_model -> inference.batch_process -> postprocessing.enhance, "
                                  + seeds.Count + " images in " + clock.ElapsedMilliseconds + " ms; status from "
                                  + parts.Count + " domains");
                service.DeleteSessionAsync(coordinationId).Wait();

                // 6. bad input from C# is an envelope, never an exception
                var missing = worker.GetSessionStatus(null);
                checks.That(!missing.Success && missing.ErrorCode == "invalid_request", "null id -> invalid_request");
                checks.That(worker.GetSessionStatus("").ErrorCode == "invalid_request", "empty id -> invalid_request");
                var unknown = worker.Execute("processing.teleport", new { });
                checks.That(unknown.ErrorCode == "invalid_request", "unknown command -> invalid_request");
                var wrongType = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic", priority = "high" });
                checks.That(wrongType.ErrorCode == "invalid_request", "priority \"high\" -> invalid_request");
                var nullParameters = worker.ExecuteWorkflow(new { workflow_id = "img-generation-basic",
                                                                  parameters = (object)null, background = false });
                checks.That(nullParameters.Text("status") == "completed", "null parameters run with the defaults");
                Reply badShape;
                var none = worker.AllocateInput(-1, 32, out badShape);
                checks.That(none == null && badShape.ErrorCode == "invalid_request", "bad input shape -> invalid_request");
                var json = worker.ExecuteJson("get_session_status", "{not json");
                checks.That(json.Contains("\"invalid_request\""), "malformed JSON -> invalid_request");

                service.DeleteSessionAsync(controlledId).Wait();
                logs.Drain();
                summary["python_log_records"] = logs.Delivered;
                summary["python_log_dropped"] = logs.Dropped;
            }

            // 6. a thread that calls while the worker closes gets `unavailable`, never an exception
            int wrong = 0, refused = 0;
            bool stop = false;
            var caller = new Thread(() =>
            {
                while (!Volatile.Read(ref stop))
                {
                    var reply = worker.GetSessionStatus(sessionId);
                    if (!reply.Success && reply.ErrorCode == "unavailable") refused++;
                    else if (!reply.Success) wrong++;
                }
            });
            caller.Start();
            Thread.Sleep(50);
            var closedReply = worker.Close(TimeSpan.FromSeconds(30));
            Thread.Sleep(50);
            Volatile.Write(ref stop, true);
            caller.Join();
            checks.That(closedReply.Success && Equals(closedReply["threads_stopped"], true), "worker closed, threads joined");
            checks.That(wrong == 0 && refused > 0, "calls during and after close: " + refused + " unavailable, " + wrong + " other");
            summary["files"] = files;
            summary["checks_failed"] = checks.Failed;
            summary["seconds"] = total.Elapsed.TotalSeconds;
            if (summaryPath != null) File.WriteAllText(summaryPath, new Reply(summary).ToString());
            Console.WriteLine(checks.Failed == 0
                ? "demo passed: " + files.Count + " PNG files in " + outputFolder + ", " + total.ElapsedMilliseconds + " ms"
                : "demo FAILED: " + checks.Failed + " check(s)");
            return checks.Failed == 0 ? 0 : 1;
        }

        /// <summary>Run (or, after a crash, resume) one batch, printing each completed item: the crash tests' host.</summary>
        static int HoldBatch(PythonRuntime runtime, string batchId, int items)
        {
            var worker = new EmbeddedProcessingWorker(runtime);
            var accepted = worker.ExecuteBatch(new
            {
                batch_id = batchId,
                workflow_id = "img-generation-basic",
                parameters = new { prompt = "calm", seed = 500, steps = 8, total_images = items },
                configuration = new { total_images = items, max_batch_size = 2 },
            });
            if (!accepted.Success) { Console.WriteLine("refused: " + accepted.Error); return 1; }
            var printed = new HashSet<string>();
            while (true)
            {
                var status = worker.GetBatch(batchId);
                foreach (Reply output in status.List("outputs"))
                    if (printed.Add(output.Text("output_id")))
                        Console.WriteLine("done " + output.Text("item_id") + " " + output.Text("output_id") + " "
                                          + output.Number("seed"));
                if (status.Text("status") == "completed" || status.Text("status") == "failed"
                    || status.Text("status") == "cancelled")
                {
                    Console.WriteLine("final " + status.Text("status"));
                    return 0;
                }
                Thread.Sleep(20);
            }
        }

        static BoardRow FollowOnBoard(ProgressBoard board, int slot, string id)
        {
            BoardRow row = default(BoardRow);
            var hash = ProgressBoard.IdHash(id);
            string shown = null;
            while (true)
            {
                if (board.TryRead(slot, out row) && row.IdHash == hash)
                {
                    int filled = (int)(row.ProgressBp * 30 / 10000);
                    string bar = "  [" + new string('#', filled) + new string('.', 30 - filled) + "] "
                                 + (row.ProgressBp / 100).ToString().PadLeft(3) + "% " + (row.Status ?? "").PadRight(10)
                                 + (row.ItemsTotal > 0 ? row.ItemsDone + "/" + row.ItemsTotal + " items" : "");
                    if (bar != shown)  // redraw on change only: a redirected console gets a short log
                    {
                        string eta = row.EtaMs >= 0 ? " eta " + (row.EtaMs / 1000.0).ToString("F1") + "s" : "";
                        Console.Write((Console.IsOutputRedirected ? "\n" : "\r") + bar + eta + "   ");
                        shown = bar;
                    }
                    if (row.Status == "completed" || row.Status == "failed" || row.Status == "cancelled") break;
                }
                Thread.Sleep(25);
            }
            Console.WriteLine();
            return row;
        }

        static void WaitForBoard(ProgressBoard board, int slot, Func<BoardRow, bool> condition)
        {
            var deadline = DateTime.UtcNow.AddSeconds(60);
            BoardRow row;
            while (DateTime.UtcNow < deadline)
            {
                if (board.TryRead(slot, out row) && condition(row)) return;
                Thread.Sleep(2);
            }
            throw new TimeoutException("board slot " + slot + " never reached the expected state");
        }

        static List<object> WriteOutputs(EmbeddedProcessingWorker worker, IList<object> outputs, string folder,
                                         string stem, string workflowId, object parameters, Checks checks)
        {
            var written = new List<object>();
            int index = 0;
            foreach (Reply output in outputs)
            {
                Reply error;
                using (var view = worker.GetOutput(output.Text("output_id"), out error))
                {
                    checks.That(view != null, "output readable: " + (error == null ? "" : error.Error));
                    if (view == null) continue;
                    checks.That(view.ReadOnly && view.Width == output.Number("width") && view.Height == output.Number("height"),
                                "output buffer matches its reference");
                    var path = Path.Combine(folder, stem + "-" + index++ + "-seed" + output.Number("seed") + ".png");
                    PngWriter.Write(path, view);
                    written.Add(new Dictionary<string, object>
                    {
                        { "path", Path.GetFullPath(path) }, { "seed", output.Number("seed") },
                        { "width", (long)view.Width }, { "height", (long)view.Height },
                        { "workflow_id", workflowId }, { "stem", stem },
                        { "parameters", PlainParameters(parameters) },
                    });
                }
            }
            return written;
        }

        static Dictionary<string, object> PlainParameters(object parameters)
        {
            var plain = new Dictionary<string, object>();
            foreach (var property in parameters.GetType().GetProperties())
            {
                var value = property.GetValue(parameters, null);
                plain[property.Name] = value is int ? (long)(int)value : value;
            }
            return plain;
        }

        sealed class Checks
        {
            public int Failed;

            public void That(bool condition, string what)
            {
                if (condition) return;
                Failed++;
                Console.WriteLine("CHECK FAILED: " + what);
            }
        }
    }
}
