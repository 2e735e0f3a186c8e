// `--hold-batch ID [--items N]`: the crash tests' host. It runs (or, after a
// crash, resumes) one stored batch and prints "done ITEM OUTPUT SEED" as each
// item completes, then "final STATUS". A test kills the whole process with
// signal 9 mid-batch and restarts a worker on the same state file: finished
// items keep their outputs, the rest run once.
using System;
using System.Collections.Generic;
using System.Threading;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class CrashTestHost
    {
        public static int Run(PythonRuntime runtime, string batchId, int items)
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
                if (WorkStatus.IsFinal(status.Text("status")))
                {
                    Console.WriteLine("final " + status.Text("status"));
                    return 0;
                }
                Thread.Sleep(20);
            }
        }
    }
}
